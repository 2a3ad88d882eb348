"""ScLabel-Net: a single-device torch transformer over gene tokens with expression values."""
