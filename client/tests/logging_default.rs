//! `Logging` works out of the box: in a program without a `tracing` subscriber (this test
//! binary, which sets none), `Logging::default()` installs one, so its lines are printed.

#[test]
fn logging_installs_a_subscriber_when_the_program_has_none() {
    assert!(
        !tracing::dispatcher::has_been_set(),
        "this test binary sets no subscriber of its own"
    );
    let logging = whispeer::Logging::default();
    assert_eq!(logging.level(), whispeer::LogLevel::INFO);
    assert!(tracing::dispatcher::has_been_set());
    assert!(
        tracing::enabled!(tracing::Level::INFO),
        "INFO events are shown"
    );
    assert!(
        !tracing::enabled!(tracing::Level::DEBUG),
        "below the level is not"
    );
}
