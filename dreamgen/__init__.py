"""dreamgen: synthetic decision-point conversations with exact direction-cue labels."""

__version__ = "0.1.0"
