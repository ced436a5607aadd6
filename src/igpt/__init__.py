"""igpt: Image GPT ("Generative Pretraining from Pixels", Chen et al., 2020) in PyTorch."""

__version__ = "0.1.0"
