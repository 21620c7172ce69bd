"""busbench: start a coordinator and N agent processes, drive them, measure the bus.

``busbench.solo`` measures r1 (one agent alone, no bus); ``busbench.procs`` starts and
reaps the processes; ``busbench.run`` orchestrates one measurement per agent count;
``busbench.__main__`` is the command.
"""
