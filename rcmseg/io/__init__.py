"""Reading mosaics and label maps, writing segmentation outputs."""
