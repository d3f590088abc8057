"""The backends behind one contract: names, availability, the auto tuner, the properties all share, and each
backend (delegate, flex, triton) through the public API."""
