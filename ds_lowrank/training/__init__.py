"""What a pretraining run needs besides the optimizer: model presets (``models``) and token data (``data``).

The submodules are imported on use: ``models`` loads transformers, which a data-only tool can do without.
"""
