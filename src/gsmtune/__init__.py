"""gsmtune: fine-tune small language models on GSM8K and measure, honestly, what they learned."""

__version__ = "0.1.0"
