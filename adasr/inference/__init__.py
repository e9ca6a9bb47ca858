"""Tiled, padded and memory-planned inference, halting pictures: what runs a network on real images."""
