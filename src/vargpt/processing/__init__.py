"""Text and image processing: tokenizers, chat prompts, image transforms."""
