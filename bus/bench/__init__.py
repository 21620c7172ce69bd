"""busbench: start a coordinator and N agent processes, drive them, measure the bus.

``bus.bench.solo`` measures r1 (one agent alone, no bus); ``bus.bench.procs`` starts and
reaps the processes; ``bus.bench.run`` orchestrates one measurement per agent count;
``bus.bench.__main__`` is the command.
"""
