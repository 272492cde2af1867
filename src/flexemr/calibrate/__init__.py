"""`flexemr calibrate`: measures this machine for the planner (`flexemr.planner.calibration`).

microbench  lookups, dense model, sockets, and the CPU time per request of a local deployment
            (`flexemr.entrypoints.deployment`), fitted to the planner's cost model
"""
