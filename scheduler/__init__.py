"""Run AI agents' train.py variants as Ray Tune trials, one GPU each, and promote the reliably better ones."""
