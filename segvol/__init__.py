"""segvol: SegVol (text, point and box prompted 3D CT segmentation) as a library and CLI."""

__version__ = "0.1.0"
