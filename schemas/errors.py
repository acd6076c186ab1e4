"""The one error type every contract check raises, so callers can turn it into a one-line message."""


class ContractError(ValueError):
  """Input that breaks a patchflow data contract; the message names the file, line or field."""
