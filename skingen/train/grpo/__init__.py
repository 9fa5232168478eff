"""Reward fine-tuning of a trained ControlNet with GRPO on sampled images (Flow-GRPO, arXiv 2505.05470), for the
flow-matching families.

``sde``: the stochastic sampler whose per-step log-probabilities are known (Flow-GRPO's ODE-to-SDE conversion);
``rewards``: ``evaluate.py``'s metrics (edge F1, OCR edit distance / accuracy) as rewards; ``objective``: group
advantages and the clipped-ratio loss with the KL penalty; ``options``: the flags; ``trainer``: the loop
(``train_controlnet_grpo.py``). docs/grpo.md says when to use it and what it costs.
"""
