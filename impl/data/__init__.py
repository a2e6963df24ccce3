"""Data efficiency: sequence packing with document masking, exact and MinHash-LSH near-duplicate removal."""

from impl.data.dedup import exact_duplicates, minhash_signatures, near_duplicates
from impl.data.digits import (
    CLASS_NAMES,
    EVAL_TEMPLATE,
    TRAIN_TEMPLATES,
    UNSEEN_TEMPLATES,
    caption_texts,
    captions,
    digit_prompts,
    load_digits_split,
)
from impl.data.packing import attention_document_ids, document_mask, pack_documents

__all__ = [
    "CLASS_NAMES", "EVAL_TEMPLATE", "TRAIN_TEMPLATES", "UNSEEN_TEMPLATES", "attention_document_ids", "caption_texts",
    "captions", "digit_prompts", "document_mask", "exact_duplicates", "load_digits_split", "minhash_signatures",
    "near_duplicates", "pack_documents",
]
