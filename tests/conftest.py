"""Shared fixtures (vgg_dir, demo_root, shared_data) live in the root conftest.py."""
