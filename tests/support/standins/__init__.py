"""Stand-ins for models outside diffusers / transformers (OmniGen2, BAGEL), written for these tests.

They make the same attention calls as the real models, with the same argument conventions, packing
and metadata (documented in each module from the models' public code), on tiny random weights.
"""
