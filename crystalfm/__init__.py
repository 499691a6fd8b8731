"""crystalfm: one console script over the stages data_pipeline → pretrain → finetune → discovery."""
__version__ = "0.1.0"
