"""Running the work: plan (units and their dependencies), steps (one unit -> one write + record), lease, reduce."""
