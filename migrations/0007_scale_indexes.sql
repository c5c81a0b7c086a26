-- Lookups that run per heartbeat or per reconcile pass on fleets with thousands of clusters:
-- the HA clusters a host is primary of (leases), and HA clusters by state (failover checks).
CREATE INDEX clusters_primary_host ON clusters (primary_host, availability);
CREATE INDEX clusters_availability ON clusters (availability, state);
