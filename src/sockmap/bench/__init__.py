"""The benchmark harness behind ``sockmap bench``: workloads run side by side, in one run,
over several paths (direct, the raw kernel sockmap pair, our engines...), with the
load generator in separate pinned processes and CPU measured for the whole machine.
"""
