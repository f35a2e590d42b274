"""The Cityscapes label table (name, id, train id, colour), transcribed from the benchmark's labels.py."""

# The rows of cityscapesscripts/helpers/labels.py (name, id, trainId, color), as the benchmark ships them.
BENCHMARK_TABLE = """
unlabeled 0 255 0,0,0
ego_vehicle 1 255 0,0,0
rectification_border 2 255 0,0,0
out_of_roi 3 255 0,0,0
static 4 255 0,0,0
dynamic 5 255 111,74,0
ground 6 255 81,0,81
road 7 0 128,64,128
sidewalk 8 1 244,35,232
parking 9 255 250,170,160
rail_track 10 255 230,150,140
building 11 2 70,70,70
wall 12 3 102,102,156
fence 13 4 190,153,153
guard_rail 14 255 180,165,180
bridge 15 255 150,100,100
tunnel 16 255 150,120,90
pole 17 5 153,153,153
polegroup 18 255 153,153,153
traffic_light 19 6 250,170,30
traffic_sign 20 7 220,220,0
vegetation 21 8 107,142,35
terrain 22 9 152,251,152
sky 23 10 70,130,180
person 24 11 220,20,60
rider 25 12 255,0,0
car 26 13 0,0,142
truck 27 14 0,0,70
bus 28 15 0,60,100
caravan 29 255 0,0,90
trailer 30 255 0,0,110
train 31 16 0,80,100
motorcycle 32 17 0,0,230
bicycle 33 18 119,11,32
"""
ROWS = [line.split() for line in BENCHMARK_TABLE.strip().splitlines()]
