"""The label set (AeroScapes' 11 classes plus background, in dataset order) and the dataset splits."""

CLASS_NAMES = ("background", "person", "bike", "car", "drone", "boat", "animal", "obstacle",
               "construction", "vegetation", "road", "sky")
IGNORE_INDEX = 255
SPLITS = ("trn", "val")  # ImageSets/<split>.txt, in this order
