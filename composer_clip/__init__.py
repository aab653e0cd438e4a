"""composer_clip: CLIP-style contrastive training with one or many encoders per side on Composer."""

__version__ = '0.1.0'
