"""Data efficiency: sequence packing with document masking, exact and MinHash-LSH near-duplicate removal."""

from impl.data.dedup import exact_duplicates, minhash_signatures, near_duplicates
from impl.data.packing import attention_document_ids, document_mask, pack_documents

__all__ = [
    "attention_document_ids",
    "document_mask", "exact_duplicates", "minhash_signatures", "near_duplicates", "pack_documents"]
