# Speed the heartbeat up: config_interval_ms = 50 (an int, so 4 bytes in
# memory order, little-endian: 50 = 0x32 -> 32 00 00 00).
# Pair with empty.c (no code needed).
V config_interval_ms 32000000
