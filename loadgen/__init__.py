"""Load generation: the Locust file and the load shapes that decide which
prompt goes to which arm, and when. Reads the workload file and the records
through core/contracts.py."""
