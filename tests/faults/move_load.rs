//! (scenario to come)
