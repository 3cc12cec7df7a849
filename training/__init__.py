"""HyperCT model, data, training, evaluation and export. Imports torch and transformers;
serving code (``app``, ``operators``) never imports this package."""
