//! In-process tests of the simulator core (control endpoints, faults,
//! quotas, outages, latency under load).

mod control;
mod faults;
mod load;
mod outage;
mod quota;
