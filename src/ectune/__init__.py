"""ectune: Easy Consistency Tuning (ECT) for few-step consistency models."""

__version__ = "0.1.0"
