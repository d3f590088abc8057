"""The evaluation harness (dar.eval): judges, runs, scoring, with the doubles of eval_fakes.py."""
