"""Images for models that cannot see: loading (images.py, fetch.py), OCR with layout (ocr.py) and the text
description a language model reads instead of the image (describe.py). The gateway hook is serve/vision.py."""
