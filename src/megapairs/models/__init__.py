"""Retrievers trained on MegaPairs data: MMRet-CLIP (score fusion) and MMRet-MLLM."""
