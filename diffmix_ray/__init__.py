"""diffmix-ray: Diff-Mix inter-class image translation as a distributed batch system on Ray."""

__version__ = "0.1.0"
