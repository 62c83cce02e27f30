"""The label set: AeroScapes' 11 classes plus background, in dataset order."""

CLASS_NAMES = ("background", "person", "bike", "car", "drone", "boat", "animal", "obstacle",
               "construction", "vegetation", "road", "sky")
IGNORE_INDEX = 255
