"""Entry points for training frameworks."""
