"""Fine-tuning recipes: thin layers over TRL and peft that say only what is GSM8K-specific."""
