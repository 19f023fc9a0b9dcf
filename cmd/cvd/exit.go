package main

import (
	"errors"
	"strings"
)

// Exit codes. They are listed in `cvd --help`.
const (
	exitOK      = 0 // success; for compare: identical
	exitFailure = 1 // an operation failed; for compare: images differ
	exitUsage   = 2 // bad command line; for check: corruption found; for compare: error
	exitLeaks   = 3 // check: leaked clusters only
)

const exitCodesHelp = `Exit codes:
  0  success (compare: identical; check: clean)
  1  failure (compare: images differ)
  2  usage error, or check found corruption, or compare could not read an image
  3  check found leaked clusters only (repairable with --repair)`

// exitError carries a specific exit code; quiet ones print nothing more.
type exitError struct {
	code  int
	err   error
	quiet bool
}

func (e *exitError) Error() string {
	if e.err == nil {
		return "exit status"
	}
	return e.err.Error()
}
func (e *exitError) Unwrap() error { return e.err }

func exitCode(err error) int {
	if err == nil {
		return exitOK
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	// cobra's argument and flag errors are usage errors.
	msg := err.Error()
	for _, p := range []string{"unknown command", "unknown flag", "unknown shorthand", "accepts ", "requires at least", "requires at most", "invalid argument", "flag needs an argument", "required flag"} {
		if strings.Contains(msg, p) {
			return exitUsage
		}
	}
	return exitFailure
}
