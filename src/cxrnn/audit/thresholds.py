"""The duplicate finder's default thresholds, apart from the code that uses them so that the training
config and the command line can read them without importing torch (the measurements behind each value
are in ``audit.phash`` and ``audit.alignment``)."""

DEFAULT_THRESHOLD = 12  # pHash bits (of 256) within which two images count as near-duplicates
DEFAULT_ALIGN_THRESHOLD = 0.9  # band-pass NCC after alignment for shifted, cropped or rotated copies
