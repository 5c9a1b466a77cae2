"""dlp: DLP-LoRA serving library (no Ray imports here)."""

__version__ = "0.1.0"
