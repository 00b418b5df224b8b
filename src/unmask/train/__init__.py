"""Training: the loop, its optimization pieces, classifier fine-tuning and RL fine-tuning."""
