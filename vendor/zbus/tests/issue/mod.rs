#[cfg(unix)]
mod issue_1003;
mod issue_1015;
mod issue_104;
mod issue_121;
#[cfg(feature = "blocking-api")]
mod issue_122;
mod issue_1478;
mod issue_173;
mod issue_260;
mod issue_466;
mod issue_68;
mod issue_799;
mod issue_81;

// Issues specific to tokio runtime.
#[cfg(all(unix, feature = "tokio", feature = "p2p"))]
mod issue_279;
#[cfg(all(unix, feature = "tokio"))]
mod issue_310;
#[cfg(all(unix, feature = "tokio"))]
mod issue_356;

#[cfg(all(unix, feature = "p2p"))]
mod issue_813;
