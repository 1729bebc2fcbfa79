"""Hugging Face Hub support: `hf://OWNER/NAME[@REVISION]` model references (`refs`), the Hub-style model folder
that `ectune export` writes (`export`, with its model card in `card`) and `ectune push` (`push`).

Nothing here imports `huggingface_hub` until a reference is resolved or a folder is pushed, so exporting needs
no extra; resolving and pushing need `pip install ectune[hub]`.
"""
