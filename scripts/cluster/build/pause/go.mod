// Module of the local cluster's pause image: a static binary that sleeps until it is told to stop.
module simcal.local/cluster/pause

go 1.26.0
