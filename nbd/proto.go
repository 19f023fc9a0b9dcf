package nbd

// Protocol constants (the NBD protocol document, "fixed newstyle negotiation"
// and "transmission phase").
const (
	magicNBD     = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt     = 0x49484156454f5054 // "IHAVEOPT"
	magicReply   = 0x0003e889045565a9 // option replies
	magicRequest = 0x25609513
	magicSimple  = 0x67446698
	magicStruct  = 0x668e33ef

	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10

	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrPolicy   = 1<<31 + 2
	repErrInvalid  = 1<<31 + 3
	repErrUnknown  = 1<<31 + 6
	repErrTooBig   = 1<<31 + 9

	infoExport    = 0
	infoName      = 1
	infoBlockSize = 3

	tflagHasFlags  = 1 << 0
	tflagReadOnly  = 1 << 1
	tflagSendFlush = 1 << 2
	tflagSendDF    = 1 << 7
	tflagMultiConn = 1 << 8
	tflagSendCache = 1 << 10

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1
	cmdFlagDF     = 1 << 2
	cmdFlagReqOne = 1 << 3

	replyFlagDone = 1 << 0

	chunkNone        = 0
	chunkOffsetData  = 1
	chunkOffsetHole  = 2
	chunkBlockStatus = 5
	chunkError       = 1<<15 + 1

	stateHole = 1 << 0
	stateZero = 1 << 1

	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95

	// metaAllocation is the one meta context served, with this ID.
	metaAllocation   = "base:allocation"
	metaAllocationID = 1
)
