//! In-process tests of the simulator core (control endpoints, faults).

mod control;
mod faults;
