"""Face identity on FLUX: the InstantID recipe (face embedding -> Resampler tokens ->
identity ControlNet with the face keypoint image) with InfiniteYou-FLUX weights."""
