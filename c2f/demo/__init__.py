"""The demo dataset: spoken descriptions of synthetic scenes, generated deterministically and shipped in c2f."""
