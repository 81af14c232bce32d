"""The SSD codec's frame map (kvstore.daemon.ssd_frames.FrameMap): which frames a range
overlaps, which lie wholly inside it, and that adding or forgetting keeps the map exact.
The reads and writes through it (FramedFile) are tested through SsdBackend in
tests/test_daemon_ssd.py and tests/test_ssd_streams.py."""

from kvstore.daemon.ssd_frames import FrameMap


def _map(*frames: tuple[int, int, int]) -> FrameMap:
    frame_map = FrameMap()
    for start, raw_bytes, stored_bytes in frames:
        frame_map.add(start, raw_bytes, stored_bytes)
    return frame_map


def test_empty_map_is_false_and_overlaps_nothing():
    frame_map = FrameMap()
    assert not frame_map
    assert frame_map.starts_in(0, 1 << 30) == []
    assert frame_map.frames_within(0, 1 << 30) == ()


def test_starts_in_finds_a_frame_reaching_into_the_range_and_stops_at_its_end():
    frame_map = _map((0, 100, 10), (100, 100, 20), (300, 50, 5))
    assert frame_map
    assert frame_map.starts_in(50, 10) == [0]                 # inside the first frame
    assert frame_map.starts_in(99, 2) == [0, 100]             # straddles two frames
    assert frame_map.starts_in(200, 100) == []                # the gap between frames
    assert frame_map.starts_in(200, 101) == [300]             # one byte of the last
    assert frame_map.starts_in(350, 10) == []                 # just past the last
    assert frame_map.frames_in(150, 200) == [(100, 100, 20), (300, 50, 5)]


def test_frames_within_keeps_only_whole_frames_relative_to_the_range():
    frame_map = _map((0, 100, 10), (100, 100, 20), (300, 50, 5))
    assert frame_map.frames_within(100, 250) == ((0, 100, 20), (200, 50, 5))
    assert frame_map.frames_within(50, 250) == ((50, 100, 20),)  # the first only in part
    assert frame_map.frames_within(100, 249) == ((0, 100, 20),)  # the last only in part


def test_add_replaces_the_frames_it_overlaps_and_forget_removes_exactly_a_range():
    frame_map = _map((0, 100, 10), (100, 100, 20), (300, 50, 5))
    frame_map.add(50, 100, 30)                                 # over the first two
    assert frame_map.frames_in(0, 1000) == [(50, 100, 30), (300, 50, 5)]
    frame_map.forget(200, 100)                                 # a gap: nothing goes
    assert frame_map.frames_in(0, 1000) == [(50, 100, 30), (300, 50, 5)]
    frame_map.forget(149, 152)                                 # one byte of each
    assert frame_map.frames_in(0, 1000) == []
    assert not frame_map
