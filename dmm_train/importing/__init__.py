"""Importing robot logs as Minari datasets: ``cli.py import``.

Readers turn a log (npz, HDF5, robomimic, rosbag2, MCAP, LeRobotDataset) into episodes of
arrays (``core.LoggedEpisode``); the core checks them, applies the T+1 observation rule and the
reward choice, and writes a real Minari dataset with the project's writer, recording the source
files' sha256 and the mapping in the dataset's metadata. The readers' libraries (h5py, pyarrow,
rosbags) are the ``[robot]`` extra, imported only when used.
"""
