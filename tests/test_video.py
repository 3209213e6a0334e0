"""video.py: drive recordings hold every frame with its caption, a bad path fails before the drive, and a
failed write leaves what was there before."""
import sys

import imageio.v3 as iio
import numpy as np
import pytest

import video


def drive(recorder: video.Recorder, steps: int) -> None:
    for t in range(steps):
        obs = np.full((96, 96, 3), 100 + t, np.uint8)                        # plain grey env frames
        recorder(obs, np.array([0.5, 1.0, 0.0]), {"energy": 1.25, "plan_ms": 60.0})


@pytest.mark.parametrize("suffix, kept", [(".mp4", 6), (".gif", 3)])            # a GIF keeps every other frame
def test_a_recording_holds_the_drive_with_the_action_written_on_it(tmp_path, suffix, kept):
    path = tmp_path / "drives" / f"drive{suffix}"                              # the folder is made
    rec = video.Recorder(str(path))
    drive(rec, 6)
    rec.save()
    frames = iio.imread(path, index=None)
    assert frames.shape == (kept, 384, 384, 3)                               # 96 x the default scale 4
    caption, plain = frames[0, 4:30, 4:200].astype(int), frames[0, 200:, 200:].astype(int)
    assert caption.std() > 20 and plain.std() < 5                             # text top left, the road untouched
    assert [p.name for p in tmp_path.joinpath("drives").iterdir()] == [path.name]   # no temporary file left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "drive.gif"
    path.write_bytes(b"the last run's drive")
    with pytest.raises(TypeError, match="Cannot handle this data type"):        # the GIF writer fails on it
        video.write_video(path, np.zeros((2, 8, 8, 5), np.uint8), duration=40)
    assert path.read_bytes() == b"the last run's drive"
    assert [p.name for p in tmp_path.iterdir()] == ["drive.gif"]


def test_an_unwritable_recording_fails_before_the_drive(monkeypatch):
    video.check_record_path("drive.gif")
    video.check_record_path("drive.mp4")                        # imageio-ffmpeg is in requirements.txt
    with pytest.raises(SystemExit, match="give a .mp4 or .gif"):
        video.check_record_path("drive.avi")
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)    # as where the plugin is not installed
    assert not video.can_write_mp4()
    with pytest.raises(SystemExit, match="needs imageio-ffmpeg"):
        video.check_record_path("drive.mp4")
    video.check_record_path("drive.gif")
